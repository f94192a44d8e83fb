"""The data path: canonical samples, sources, splitting, boxes, the processor and the data module."""
