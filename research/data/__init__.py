"""Data stages: the embedded dataset builder, scan, cleansing, splitting, dataset versions."""
