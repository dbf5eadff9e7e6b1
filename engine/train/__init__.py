"""Training a model set: every hyperparameter (profiles.py), one network's run (trainer.py), a set's plan sized to
its data (plan.py) and the joint models (joint.py)."""
