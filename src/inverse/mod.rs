//! Measurement operators, blur-kernel generators and image-quality metrics.
