"""pid: Physics Informed Distillation and moment matching for EDM diffusion teachers."""
