"""The images a model set learns from and is measured on: CIFAR-10's files (cifar10.py) and a folder of the user's
own photos at a working size S (model_sets.py)."""
