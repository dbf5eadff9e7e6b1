"""The networks and their files: architectures (networks.py), safetensors + manifests (weights.py), checkpoints of a
run in progress (checkpoint.py), what a model was trained on (provenance.py) and SSL heads on the classifier's
backbone (heads.py)."""
