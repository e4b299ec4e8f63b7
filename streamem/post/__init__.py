"""Post-processing: masks, mask-corrected FSC, sharpening, local resolution."""
