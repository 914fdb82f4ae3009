"""Deployment artifacts checked offline: KubeRay manifests (k8s/), Ray cluster-launcher YAML (cluster/),
the image's Ray pin (Dockerfile). `orchestrator k8s validate` and `orchestrator cluster validate` run them."""
