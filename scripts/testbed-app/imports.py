# Cold-start workload "imports" of scripts/bench-pull.sh: imports a wide spread of the standard
# library (packages, C extensions, their .pyc files) and prints how many modules it imported.
import importlib

MODULES = """
abc argparse array ast asynchat asyncio asyncio.base_events asyncio.events asyncio.futures
asyncio.locks asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks asyncore atexit
base64 bdb binascii bisect bz2 cProfile calendar cgi cgitb chunk cmath cmd code codecs codeop
collections collections.abc colorsys compileall concurrent.futures concurrent.futures.process
concurrent.futures.thread configparser contextlib contextvars copy copyreg crypt csv ctypes
ctypes.util curses curses.ascii curses.panel curses.textpad dataclasses datetime dbm dbm.dumb
dbm.ndbm decimal difflib dis doctest email email.base64mime email.charset email.contentmanager
email.encoders email.errors email.feedparser email.generator email.header email.headerregistry
email.iterators email.message email.mime.application email.mime.audio email.mime.base
email.mime.image email.mime.multipart email.mime.nonmultipart email.mime.text email.parser
email.policy email.quoprimime email.utils encodings.idna encodings.punycode encodings.utf_16
encodings.cp1252 encodings.latin_1 encodings.base64_codec encodings.hex_codec encodings.zlib_codec
encodings.bz2_codec encodings.euc_jp encodings.gb2312 encodings.big5 encodings.shift_jis
enum errno faulthandler filecmp fileinput fnmatch fractions ftplib functools gc getopt getpass
gettext glob graphlib grp gzip hashlib heapq hmac html html.entities html.parser http http.client
http.cookiejar http.cookies http.server imaplib imghdr importlib importlib.abc importlib.metadata
importlib.resources importlib.util inspect io ipaddress itertools json json.decoder json.encoder
json.tool keyword linecache locale logging logging.config logging.handlers lzma mailbox mailcap
marshal math mimetypes mmap modulefinder multiprocessing multiprocessing.connection
multiprocessing.managers multiprocessing.pool multiprocessing.queues multiprocessing.shared_memory
multiprocessing.synchronize netrc nntplib numbers opcode operator optparse os pathlib pdb pickle
pickletools pipes pkgutil platform plistlib poplib posixpath pprint profile pstats pty py_compile
pyclbr pydoc queue quopri random re readline reprlib resource rlcompleter runpy sched secrets
select selectors shelve shlex shutil signal smtplib sndhdr socket socketserver sqlite3
sqlite3.dbapi2 ssl stat statistics string stringprep struct subprocess sunau symtable sysconfig
tabnanny tarfile telnetlib tempfile termios textwrap threading timeit token tokenize tomllib trace
traceback tracemalloc tty types typing unicodedata unittest unittest.mock urllib
urllib.error urllib.parse urllib.request urllib.response urllib.robotparser uu uuid venv warnings
wave weakref webbrowser wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util
wsgiref.validate xdrlib xml.dom xml.dom.minidom xml.dom.pulldom xml.etree.ElementPath
xml.etree.ElementTree xml.parsers.expat xml.sax xml.sax.handler xml.sax.saxutils
xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib zoneinfo
""".split()

for name in MODULES:
    importlib.import_module(name)
print("imported", len(MODULES), "modules")
