"""Generated images with ground truth: nuclei (fluorescence and H&E) and synthetic slides."""
