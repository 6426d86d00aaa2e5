"""The onebox command."""
