"""Entry points of the four studies; each is an absl app: `python -m experiments.<study>`."""
