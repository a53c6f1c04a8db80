"""Every use of a third-party library's private API, one module per library, each checked against the installed version at start."""
