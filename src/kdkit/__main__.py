from kdkit.cli import app

app()
