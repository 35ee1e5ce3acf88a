//! Noise schedules and the DDPM / DDIM schedulers.
