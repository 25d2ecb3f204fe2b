"""Polyp detection: frame generator, U-Net detector, Grad-CAM explanations, training."""
