"""File formats: MRC (``mrc``), movies and gains (``movies``), SerialEM mdoc (``mdoc``),
RELION 5 STAR (``star``), IMOD text/model/command files (``imod``), Warp XML (``warp``), and
``inspect`` (a summary of any of them). Each wraps a maintained library behind our own
functions; readers raise ``tomopipe.errors.InputFileError`` naming the file; writers are
atomic. Import the submodules directly (``from tomopipe.io.mrc import read_mrc``)."""
