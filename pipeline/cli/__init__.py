"""The tileseg command line (`pipeline.cli.main`)."""
