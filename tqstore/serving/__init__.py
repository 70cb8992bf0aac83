"""The serving side: an OpenAI-compatible endpoint (http.py) over a continuous-batching engine
(engine.py) that runs an mlx-lm model with the paged TurboQuant cache and the daemon."""
