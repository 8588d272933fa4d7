"""The control API: routes, the types of its answers, metrics, the event stream."""
