"""What a person sees: the gateway's web pages and the JupyterLab extension (assets only)."""
