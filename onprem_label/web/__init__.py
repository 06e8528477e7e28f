"""Web layer: thin Flask handlers (HTML pages and the JSON API) over the core packages."""
