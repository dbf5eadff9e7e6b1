"""The repair without PyTorch: numpy, onnxruntime and Pillow read an exported bundle (``cli.py export``) and repair a
folder of images with the same draws, outputs and report as ``cli.py repair``. Nothing here imports torch."""
