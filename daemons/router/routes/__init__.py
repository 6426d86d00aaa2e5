"""The API by area, one module each; `daemons.router.app` includes them all."""
