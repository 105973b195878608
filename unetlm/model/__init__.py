"""Stage layout, the U-Net composition and generation."""
