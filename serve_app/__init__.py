"""OpenAI-shaped image generation served by Ray Serve and diffusers."""
