"""Shipping: ONNX export, serving-cost measurement, quantization, the registry and promotion."""
