"""Segmenting one image: the driver plans the tiles and runs the tasks that each read, infer and
write their own output chunks."""
