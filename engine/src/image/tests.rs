//! Tests for the image format: one per failure mode.
