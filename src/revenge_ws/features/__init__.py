"""The media server's live channels, built on the node's seams (handlers, hooks, policy).

Each module has an ``install`` that registers request handlers, HTTP routes and hooks;
``revenge_ws.app`` calls them. Features never touch sockets.
"""
