"""The Gradio app's parts, one module per tab plus what they share; `app.py` assembles them."""
