"""Contract of A1111 v1.10.1's ``modules`` package for AlignIT's glue (see ../README.md)."""
