"""The viewer's routes, one router per area: the page and its static files, the viewer's options and
status, runs (create, poll, files, download), a run's layers (pictures and numbers), comparisons."""
