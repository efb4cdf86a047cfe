"""GitHub webhooks: a project's connected repository and sealed secret, the signed delivery endpoint
(``/hooks/github/<project uuid>/``), the replay guard, and the events that start agent runs on the project."""
