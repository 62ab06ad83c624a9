"""PatchScaler: patch-adaptive group sampling with a confidence map, a Patch-DiT and a texture prompt.

Modules: pgs (the sampler, usable with any x0-predicting denoiser), grm (global restoration module and
its confidence-driven loss), dit (Patch-DiT), texture (texture classifier, reference texture memory,
similarity-aware texture encoder), procedural (procedural textures for offline tests)."""
