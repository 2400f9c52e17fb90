//! cowfs: a FUSE copy-on-write image layer (see the cowfs issue and DESIGN.md).
