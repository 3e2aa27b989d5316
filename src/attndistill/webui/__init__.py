"""The web UI (Gradio): ``app`` builds the page, ``tabs`` one tab per task, ``fields`` the inputs, ``jobs``
what runs behind it without Gradio."""
