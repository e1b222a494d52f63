# Copyright © 2026 mlx-patternkv authors.
"""Read the text of a document for `pkv-mlx ask`: .txt, .md, .html / .htm and .pdf.

HTML goes through the standard library's `html.parser`; PDF through `pypdf`. Every failure is a
`DocumentError` whose message names the file and what is wrong with it.
"""

import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
PDF_SUFFIXES = (".pdf",)
SUPPORTED = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES


class DocumentError(Exception):
    """A document that cannot be used, with a message for the user."""


def read_document(path) -> str:
    """The text of the document at `path`, by its file type. Raises DocumentError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DocumentError(f"Document not found: {path}")
    if path.is_dir():
        raise DocumentError(f"Document is a folder, not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DocumentError(
            f"Unsupported document type {suffix or '(no extension)'!r}: {path}\n"
            f"Supported: .txt, .md, .html, .htm, .pdf"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DocumentError(f"Cannot read document {path}: {e.strerror or e}") from None

    if suffix in PDF_SUFFIXES:
        text = pdf_text(data, path)
    elif suffix in HTML_SUFFIXES:
        text = html_text(decode_text(data, path))
    else:
        text = decode_text(data, path)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DocumentError(f"Document has no text: {path}")
    return text


def document_hash(text: str) -> str:
    """sha256 of the text the model reads (so a re-saved file with the same text keeps its cache)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def decode_text(data: bytes, path) -> str:
    """UTF-8 (with or without BOM), or UTF-16 with a BOM. Anything else is refused: a wrong guess
    would feed the model garbled text without anyone noticing."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(
            f"Cannot read document {path}: not UTF-8 text (invalid byte at offset {e.start}). "
            f"Convert it to UTF-8 first, e.g. `iconv -f latin1 -t utf-8`."
        ) from None


# Elements whose content is not text a reader sees
_SKIP = {"script", "style", "noscript", "template", "svg", "head"}
# Elements that start a new line of text
_BLOCK = {
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "figcaption",
    "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main",
    "nav", "ol", "p", "pre", "section", "table", "td", "th", "title", "tr", "ul",
}  # fmt: skip


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts = []
        self.skip = 0
        self.title = []
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        elif tag in _SKIP:
            self.skip += 1
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        elif tag in _SKIP and self.skip:
            self.skip -= 1
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif not self.skip:
            self.parts.append(data)


def html_text(html: str) -> str:
    """The visible text of an HTML page: title first, scripts and styles dropped, one line per block."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    title = " ".join("".join(parser.title).split())
    lines = (" ".join(line.split()) for line in "".join(parser.parts).split("\n"))
    body = "\n".join(line for line in lines if line)
    return f"{title}\n\n{body}" if title and not body.startswith(title) else body


def pdf_text(data: bytes, path) -> str:
    """Text of every page of a PDF, pages separated by blank lines (pypdf's extraction)."""
    import io

    try:
        import pypdf
        from pypdf.errors import PyPdfError
    except ImportError:
        raise DocumentError(
            f"Reading PDF files needs the pypdf package: pip install pypdf ({path})"
        ) from None
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"Cannot read document {path}: the PDF is password-protected")
        pages = [page.extract_text() or "" for page in reader.pages]
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError(f"Cannot read document {path}: not a readable PDF ({e})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise DocumentError(
            f"Document has no extractable text: {path} "
            f"({len(pages)} page(s); a scanned PDF needs OCR first)"
        )
    return re.sub(r"\n{3,}", "\n\n", text)
