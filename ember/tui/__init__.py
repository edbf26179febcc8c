"""The terminal chat app (`ember chat`, and `ember run MODEL` on a terminal): `app.ChatApp` on
Textual, the conversation's state and files in `conversation`, its widgets in `widgets`."""
