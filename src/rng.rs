//! Counter-based normal random numbers.
