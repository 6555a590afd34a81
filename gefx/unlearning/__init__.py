"""The application wing: the unlearning main job (``gefx profile``) built on the engine's public
functions: objectives (per-sample unlearning objectives and regularisers), data (the synthetic
TOFU-style set, real TOFU), models (the built-in default model, loading by name or path),
profile (the measured unlearning run) and report (tables and plots). ``gefx.objectives`` and the
other old names still import these modules."""
