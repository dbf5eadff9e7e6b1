"""Export of the PyTorch reference to deployment engines: ONNX graphs (onnx_export) and TensorRT engines."""
