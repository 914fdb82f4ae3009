"""Ray LLM orchestrator: continued pretraining and SFT on Ray Train."""
