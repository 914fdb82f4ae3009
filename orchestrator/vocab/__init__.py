"""Domain vocabulary: train a SentencePiece model on domain documents (seeded with word lists) and
merge its pieces into a base tokenizer (SentencePiece `tokenizer.model` or byte-level BPE
`tokenizer.json`) so domain text takes fewer tokens. Pure functions; no Ray."""
