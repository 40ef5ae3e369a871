//! The self-check of the fused decode step against the reference forward pass.
