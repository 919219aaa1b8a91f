package v2

import (
	"github.com/docker/docker/api/types"
	"github.com/docker/docker/pkg/plugins"
)

type Plugin struct{ PluginObj types.Plugin }

func (*Plugin) Name() string              { return "" }
func (*Plugin) ScopedPath(s string) string { return s }
func (*Plugin) IsV1() bool                { return false }
func (*Plugin) Client() *plugins.Client   { return nil }
