"""Named projects: persistent workspaces that agent runs build on, one run at a time (issue #10)."""
