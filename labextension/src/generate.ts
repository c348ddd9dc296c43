/**
 * Highlighting for `%%generate` cells: the options line as options, the
 * prompts below it as the plain text they are.
 *
 * JupyterLab 4 gives every code cell the language of the notebook's kernel
 * (`text/x-ipython`, Python's Lezer grammar): `and`, `for`, `is` and numbers
 * inside a prompt come out coloured as code. Each CodeMirror editor holds its
 * language in a compartment of its own; through `IEditorExtensionRegistry`
 * this module adds a second one, at the highest precedence, holding a stream
 * language while the cell's first non-blank line is `%%generate` (and the
 * editor's MIME type is Python's) and nothing otherwise. CodeMirror parses
 * with the first language it is given, so such a cell gets the tokenizer
 * below (its `.cm-content` says `data-language="nbollama-generate"`), every
 * other cell stays Python, and the cell's MIME type (which the notebook resets
 * on every kernel change) is left alone.
 *
 * Tokens (each with a stable `cm-nbollama-*` class, and a standard tag so the
 * JupyterLab theme colours it): the magic's name, its options, their values,
 * `{name}`/`$name` fields, and in the prompts only `---` separators and
 * `{name}` placeholders (the `_FIELD` rule of `nbollama/magics/_prompts.py`).
 */

import { StreamLanguage, StringStream, syntaxHighlighting } from '@codemirror/language';
import { Compartment, EditorState, Extension, Prec } from '@codemirror/state';
import { ViewPlugin } from '@codemirror/view';
import { Tag, tagHighlighter, tags as t } from '@lezer/highlight';

/** MIME types of the editors that get it: a notebook's Python cells (before and after the kernel answers). */
const PYTHON_MIME = /^text\/x-i?python$/;

/** The magic whose body is prompts, not Python, at the start of a line. */
const FIRST_LINE = /^[ \t]*%%generate(?=[ \t]|$)/;

/** Whether `source` is a `%%generate` cell: its first non-blank line starts with the magic. */
export function isGenerateCell(source: string): boolean {
  const match = /^(?:[ \t]*\r?\n)*([^\r\n]*)/.exec(source);
  return match !== null && FIRST_LINE.test(match[1]);
}

/** Tags of our own, for the classes below (the theme knows only the standard ones). */
export const generateTags = {
  magic: Tag.define(),
  option: Tag.define(),
  value: Tag.define(),
  field: Tag.define(),
  separator: Tag.define(),
  placeholder: Tag.define()
};

/** The stable classes our tokens carry, whatever the theme (tests and style/base.css use them). */
export const GENERATE_CLASSES = {
  magic: 'cm-nbollama-magic',
  option: 'cm-nbollama-option',
  value: 'cm-nbollama-value',
  field: 'cm-nbollama-field',
  separator: 'cm-nbollama-separator',
  placeholder: 'cm-nbollama-placeholder'
} as const;

export const generateHighlighter = tagHighlighter(
  (Object.keys(GENERATE_CLASSES) as (keyof typeof GENERATE_CLASSES)[]).map(key => ({
    tag: generateTags[key],
    class: GENERATE_CLASSES[key]
  }))
);

type Phase = 'before' | 'options' | 'prompts';

interface IGenerateState {
  phase: Phase;
}

/** `{name}` with a plain identifier, not part of a doubled `{{name}}` (as `_prompts._FIELD`). */
const FIELD = /^\{[\p{L}_][\p{L}\p{N}_]*\}/u;
const SEPARATOR = /^[ \t]*---[ \t]*$/;
const OPTION = /^--?[A-Za-z][\w-]*/;
const NUMBER = /^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?=[\s,]|$)/;
const QUOTED = /^(?:'[^']*'?|"(?:[^"\\]|\\.)*"?)/;
const DOLLAR_FIELD = /^\$[A-Za-z_]\w*/;

function field(stream: StringStream): boolean {
  const before = stream.pos > 0 ? stream.string[stream.pos - 1] : '';
  if (before === '{') {
    return false;
  }
  const match = stream.match(FIELD, false) as RegExpMatchArray | null;
  if (match === null || stream.string[stream.pos + match[0].length] === '}') {
    return false;
  }
  stream.pos += match[0].length;
  return true;
}

/** One token of the `%%generate --opt value ...` line. */
function optionsToken(stream: StringStream): string | null {
  if (stream.sol() && stream.match(FIRST_LINE)) {
    return 'magic';
  }
  if (stream.eatSpace()) {
    return null;
  }
  if (stream.match(OPTION)) {
    return 'option';
  }
  if (stream.match(QUOTED)) {
    return 'string';
  }
  if (stream.match(DOLLAR_FIELD) || field(stream)) {
    return 'field';
  }
  if (stream.match(NUMBER)) {
    return 'number';
  }
  if (stream.eat('=')) {
    return null;
  }
  if (!stream.match(/^[^\s'"{$=]+/)) {
    stream.next();
  }
  return 'value';
}

/** One token of a prompt: a `---` line, a `{name}` placeholder, or plain text (null). */
function promptToken(stream: StringStream): string | null {
  if (stream.sol() && stream.match(SEPARATOR)) {
    return 'separator';
  }
  if (stream.peek() === '{' && field(stream)) {
    return 'placeholder';
  }
  stream.next();
  while (!stream.eol() && stream.peek() !== '{') {
    stream.next();
  }
  return null;
}

/** The stream parser of a whole `%%generate` cell. */
export const generateLanguage = StreamLanguage.define<IGenerateState>({
  name: 'nbollama-generate',
  startState: () => ({ phase: 'before' }),
  copyState: state => ({ phase: state.phase }),
  token(stream, state) {
    if (stream.sol()) {
      if (state.phase === 'before' && /\S/.test(stream.string)) {
        state.phase = 'options';
      } else if (state.phase === 'options') {
        state.phase = 'prompts';
      }
    }
    if (state.phase === 'prompts') {
      return promptToken(stream);
    }
    if (state.phase === 'before') {
      stream.skipToEnd();
      return null;
    }
    return optionsToken(stream);
  },
  blankLine(state) {
    if (state.phase === 'options') {
      state.phase = 'prompts';
    }
  },
  tokenTable: {
    magic: [t.meta, generateTags.magic],
    option: [t.attributeName, generateTags.option],
    string: [t.string, generateTags.value],
    number: [t.number, generateTags.value],
    value: [generateTags.value],
    field: [t.special(t.variableName), generateTags.field],
    separator: [t.contentSeparator, generateTags.separator],
    placeholder: [t.special(t.variableName), generateTags.placeholder]
  }
});

/** Something with a MIME type that can change: JupyterLab's `CodeEditor.IModel`. */
export interface IMimeSource {
  readonly mimeType: string;
  readonly mimeTypeChanged?: {
    connect(slot: () => void): unknown;
    disconnect(slot: () => void): unknown;
  };
}

/** How far into a cell the first line is looked for (leading blank lines included). */
const LOOK_AHEAD = 2000;

/**
 * The editor extension: `generateLanguage` wins over the editor's own
 * language while the document is a `%%generate` cell of a Python editor.
 * Without `source` the editor counts as Python (a plain CodeMirror view);
 * `initialDoc` is the text the editor starts with.
 *
 * The language sits in a compartment that holds nothing otherwise: naming
 * CodeMirror's `language` facet at all would add its parse state to editors
 * that have no language yet (JupyterLab loads one after the editor is made).
 * Edits switch it in the same transaction; a MIME type change, just after.
 */
export function generateCellHighlighting(source?: IMimeSource, initialDoc = ''): Extension {
  const mode = new Compartment();
  const on: Extension = Prec.highest(generateLanguage);
  const off: Extension = [];
  const wanted = (doc: string): boolean =>
    (source === undefined || PYTHON_MIME.test(source.mimeType)) && isGenerateCell(doc);
  const head = (state: EditorState): string => state.sliceDoc(0, LOOK_AHEAD);

  const follow = ViewPlugin.define(view => {
    let destroyed = false;
    const check = (): void => {
      // never inside a view update: the MIME type is set while JupyterLab builds the cell
      void Promise.resolve().then(() => {
        const want = wanted(head(view.state));
        if (!destroyed && want !== (mode.get(view.state) === on)) {
          view.dispatch({ effects: mode.reconfigure(want ? on : off) });
        }
      });
    };
    source?.mimeTypeChanged?.connect(check);
    check();
    return {
      destroy: () => {
        destroyed = true;
        source?.mimeTypeChanged?.disconnect(check);
      }
    };
  });

  return [
    mode.of(wanted(initialDoc.slice(0, LOOK_AHEAD)) ? on : off),
    EditorState.transactionExtender.of(tr => {
      if (!tr.docChanged) {
        return null;
      }
      const want = wanted(tr.newDoc.sliceString(0, LOOK_AHEAD));
      return want === (mode.get(tr.startState) === on)
        ? null
        : { effects: mode.reconfigure(want ? on : off) };
    }),
    follow,
    syntaxHighlighting(generateHighlighter)
  ];
}
