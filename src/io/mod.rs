//! File formats: safetensors, PyTorch `.bin`, `.npy` and images.
