"""``python -m dash_gateway``: same as the ``dash-gateway`` command."""

# Imported, not run as __main__: the extension is identified by its module's package name.
from dash_gateway.app import main

if __name__ == "__main__":
    main()
