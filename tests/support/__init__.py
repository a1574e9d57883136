"""Test infrastructure: real upstream registries, a token server and image generators."""
