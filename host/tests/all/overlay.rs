//! The overlay driver (in progress).
