"""The listeners' own HTTP/1.1 server (an asyncio ``Protocol`` around aiohttp's C parser); see ``server.py``."""
