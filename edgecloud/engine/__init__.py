"""TensorRT engine toolchain: build an engine from a QDQ ONNX model, describe it in a sidecar, and
cache it per ONNX file, TensorRT version and device. TensorRT itself is imported only where a build runs."""
