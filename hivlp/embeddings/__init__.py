"""Embedding exports: the on-disk format (`format`) and the exporter that writes it (`export`)."""
